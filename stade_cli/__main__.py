from stade_cli.cli.app import main

main()
