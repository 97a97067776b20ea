"""pykka actors (Gateway, Supervisor, LoadBalancer, Distribution) and their pure logic."""
