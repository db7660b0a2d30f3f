"""``python -m idql_pl.benchmark_concurrency``: the command line of
:mod:`idql_pl.experiments.benchmark_concurrency`."""

if __name__ == "__main__":
    from idql_pl.entrypoint import run_main
    from idql_pl.experiments.benchmark_concurrency import main

    run_main(main)
