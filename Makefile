# Thin aliases for tasks.py (which needs nothing but Python 3.11).
.PHONY: env test book book-smoke
env:
	python3.11 tasks.py env
test:
	python3.11 tasks.py test
book:
	python3.11 tasks.py book
book-smoke:
	python3.11 tasks.py book --mode smoke
