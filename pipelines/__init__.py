"""Job graphs: thin Beam (and, later, PyFlink) adapters around the pure logic in transforms/ and trainer/."""
