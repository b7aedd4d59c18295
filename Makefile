# Thin aliases for ./dev, which needs nothing but bash and Python (see ./dev help).
.PHONY: run test bench proto lint fmt
run test bench proto lint fmt:
	./dev $@
