"""`python -m emulator [--host H] [--port P]`: serve every provider emulator (see emulator.server)."""

from emulator.server import main

main()
