"""`dsv4-nvfp4` command line (placeholder until the subcommands land)."""


def main(argv=None) -> int:
    return 0
