from kdcli.cli import main

if __name__ == "__main__":  # not when a spawned worker (DataLoader, torchrun) re-imports the main module
    main()
