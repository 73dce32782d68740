"""The ground floor every other package stands on: errors, device and dtype policy, the hub, logs, memory stats and
safe file writes. Imports nothing else of velora_cli."""
