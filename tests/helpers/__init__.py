"""Code the tests share, imported as `helpers.<module>`: tests/conftest.py puts tests/ on sys.path
(pytest's default import mode), so every test folder reaches it the same way."""
