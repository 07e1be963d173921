"""Prefill/decode disaggregation (docs/DISAGGREGATION.md): the KV connector (connector.py),
the transports between a prefill and a decode instance (transport.py) and the OpenAI-speaking
router in front of them (router.py). Nothing here runs unless `moeflow serve --role` or
`moeflow router` asks for it."""
