"""How jobs are launched: the ``streamrec`` command line and the engine runners."""
