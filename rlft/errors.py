"""The one exception type users see: a problem with their input, said in one line."""


class RlftError(Exception):
    """Bad input or state a user can fix. The CLI prints the message alone (no traceback) and exits 2.

    Messages name the problem and the fix, e.g. "data file 'x.jsonl' not found: check data.path".
    """
