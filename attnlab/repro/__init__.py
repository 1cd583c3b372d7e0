"""`attnlab repro`: the papers' claims reproduced at laptop scale, each judged by a rule stated before the run.

* `claim.py`: the `Claim` record (the paper's statement, the statistic, the pre-stated `Rule`, the run) and its
  registration as a catalogue entry of kind "repro";
* `claims/`: the claims, one module per theme;
* `runner.py`: runs a claim over seeds, applies the rule, writes the figure, table and verdict line, and records
  the outcome in the results store (suite "repro");
* `section.py`: the rows of the report's "Claims" section, read from the store;
* `cli.py`: `attnlab repro list | ID | --all`.
"""
