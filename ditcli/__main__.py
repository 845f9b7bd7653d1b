from ditcli.cli.app import main

main()
