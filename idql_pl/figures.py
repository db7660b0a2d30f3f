"""``python -m idql_pl.figures``: the command line of :mod:`idql_pl.experiments.figures`."""

from idql_pl.runtime import passive_openmp_wait

if __name__ == "__main__":
    passive_openmp_wait()  # as python -m idql_pl does, before torch starts OpenMP
    from idql_pl.entrypoint import run_main
    from idql_pl.experiments.figures import main

    run_main(main)
