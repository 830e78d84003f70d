"""The scoring core: pure functions on arrays that rank unlabelled tasks, and the query strategies built on them.

`base` holds the contract (`Pool`, `Strategy`), `uncertainty` and `diversity` the measures, `strategies` and
`hybrid` the strategies, `registry` the lookup by name. Nothing here imports Flask, Redis or the Label Studio SDK.
"""
