"""The agent role: wires stores -> files -> usage -> reload -> report for each credential it follows."""
