from gatefleet.cli import main

main()
