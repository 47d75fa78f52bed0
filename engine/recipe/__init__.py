"""Stage 1, the recipe: what a user asked for, read and checked before any model is opened.

    recipe.yml ─► schema.py (pydantic models) ─► load.py (YAML, parameter resolution) ─► validation.py
                                                  modules.py (VLM `modules:`), mergekit_flags.py (mergekit-yaml's options)

Owns: the recipe schema, the dtype names a recipe accepts, parameter resolution per tensor, the
warnings for keys mergeng ignores, mergekit-yaml's command-line options.
May import: methods/ (to check method names and parameters), architectures/, errors, version;
nothing else of engine/.
Invariant: nothing here reads a model file; a recipe that loads is well-formed, and every key it
ignores is a warning.
"""
