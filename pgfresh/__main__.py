from pgfresh.cli import main

main()
