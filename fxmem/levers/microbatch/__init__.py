"""levers/microbatch"""
