from flexinfer.cli import main

main()
