from kdsr.cli import main

main()
