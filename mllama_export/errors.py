class MllamaExportError(Exception):
    """An error the user can fix: the message says what was wrong, what was expected and what exists."""
