# Thin aliases for ./dev, which needs nothing but bash and Python (see ./dev help): every
# ./dev task is a target (tests/e2e/test_cli.py checks that none is missing).
.PHONY: run test bench proto lint fmt dist help
run test bench proto lint fmt dist help:
	./dev $@
