"""The case files are for type checkers only.

pytest must not import them (``--doctest-modules`` imports every module it
finds): should_fail files raise on import, on purpose.  test_typing.py feeds
them to mypy and pyright instead.
"""

collect_ignore = ["should_pass", "should_fail"]
