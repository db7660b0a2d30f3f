"""``python -m idql_pl.report``: the command line of :mod:`idql_pl.experiments.report`."""

if __name__ == "__main__":
    from idql_pl.entrypoint import run_main
    from idql_pl.experiments.report import main

    run_main(main)
