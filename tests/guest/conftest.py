# The in-guest tests run only inside the QEMU guest (tests/guest/launcher.py);
# the host runs them through tests/test_guest.py.  launcher.py is a module,
# not a test file.
collect_ignore = ["in_guest", "launcher.py"]
