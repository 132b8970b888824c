"""Configuration in sections: the schema (schema.py: options, their domains, sections) and the parsers
generated from it for every command (parsing.py). Each component declares its own section in its own
module; the commands compose them (train/config.py, evaluation/command.py)."""
