"""Event schemas (Avro, with Arrow equivalents) and the schema-driven feature spec."""
