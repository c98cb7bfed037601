"""Reference pages generated from the code and the results, so that they cannot drift from them:
docs/configuration.md from the settings class, docs/benchmarks.md from reports/bench/*.json.

    driftline reference configuration --write     # docs/configuration.md
    driftline reference benchmarks --write        # docs/benchmarks.md
"""
