from ditcli.cli import main

main()
