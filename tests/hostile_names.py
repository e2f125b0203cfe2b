"""Plan names a user or a shared workflow may send that must never become a file name.

One table for every place that takes a plan name: the plan-file code (tests/unit) and the
Save Plan node's validation (tests/integration) both run it.
"""

HOSTILE_NAMES = [
    "", " ", "../evil", "a/b", "a\\b", "/abs", "C:\\x", "..", "x..y", ".hidden", "-x", "a" * 65,
    "tab\there", "nul\x00", "é", "trailing.", "trailing ", "con:", "evil\n", "evil\r\n", "\nevil",
    "CON", "con", "Nul", "aux", "PRN", "COM1", "com9", "LPT1", "lpt3", "CON.json", "nul.txt", "AUX .plan",
    "CONIN$", 3, None,
]

GOOD_NAMES = ["my plan", "flux-dev_20.steps", "a", "x.json", "A1", "console", "COM10", "nullable", "con-2"]
