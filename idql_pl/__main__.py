"""``python -m idql_pl fit --config configs/quickstart.yaml`` (also ``validate``, ``test``, ``export``)."""

from idql_pl.runtime import passive_openmp_wait

if __name__ == "__main__":
    passive_openmp_wait()  # before torch is imported: OpenMP reads its wait policy once, when it starts
    from idql_pl.entrypoint import run_main
    from idql_pl.training.cli import main

    run_main(main)
