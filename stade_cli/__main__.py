from stade_cli.cli.entry import main

main()
