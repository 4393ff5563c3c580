from tinker_gateway.server import main

main()
