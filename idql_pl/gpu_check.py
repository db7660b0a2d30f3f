"""``python -m idql_pl.gpu_check``: the command line of :mod:`idql_pl.experiments.gpu_check`."""

if __name__ == "__main__":
    from idql_pl.entrypoint import run_main
    from idql_pl.experiments.gpu_check import main

    run_main(main)
