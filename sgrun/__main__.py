from sgrun.cli import main

main()
