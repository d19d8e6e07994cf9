"""Tools for developing pvt_dense itself (the benchmark, the bad-input table, the HuggingFace reference model); not
part of the installed package. tools/benchmark.py, tools/bad_input_table.py and the tests put the repository root on
sys.path to import it."""
