"""Replica autoscaling: a pure decision core (reactive rules, panic window, forecast and scheduled
floors) behind Ray Serve's custom autoscaling policy API."""
