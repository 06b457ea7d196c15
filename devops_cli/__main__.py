from devops_cli.cli import main

main()
