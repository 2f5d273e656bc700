"""`robustserve` on the device, whose Python lacks the serving stack (cryptography, TorchServe): the commands whose
parser needs it (package, serve, bench) are left out; train, eval and run --no-serve are the CLI's own."""
import argparse
import sys

from serving import cli

for name, cmd in list(cli.COMMANDS.items()):
    try:
        cmd.configure(argparse.ArgumentParser())
    except ImportError as err:
        print(f"rs.py: leaving out `{name}` ({err})", file=sys.stderr)
        del cli.COMMANDS[name]
sys.exit(cli.main())
