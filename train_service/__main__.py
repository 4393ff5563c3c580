from train_service.server import main

main()
