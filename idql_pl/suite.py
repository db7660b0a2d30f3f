"""``python -m idql_pl.suite``: the command line of :mod:`idql_pl.experiments.suite`."""

if __name__ == "__main__":
    from idql_pl.entrypoint import run_main
    from idql_pl.experiments.suite import main

    run_main(main)
