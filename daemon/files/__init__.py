"""From a payload to versioned files: render (templates), renderworker (a killable child), writer (the layout).

It never looks at processes or stores.
"""
