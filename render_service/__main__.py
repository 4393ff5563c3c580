from render_service.server import main

main()
