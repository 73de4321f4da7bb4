"""Tools around the product: the built-in load emitter, the local cluster of real processes, the demo.

They start and drive real processes; may import control/ and the base modules, and nothing imports them but the CLI.
"""
