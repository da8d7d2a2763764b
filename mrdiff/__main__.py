from mrdiff.cli import main

main()
