"""The `lape-awq` command: its entry point, shared arguments and the offline subcommands."""
