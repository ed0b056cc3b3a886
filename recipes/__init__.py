"""The shipped recipes, installed as package data so that `extends: NAME` and
`fpo recipes list` / `fpo recipes show NAME` work from any installation."""
