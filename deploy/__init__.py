"""Deploying the MoE serving system on Ray: ``python -m deploy up|status|scale|down|demo``.

``deploy.launcher`` has the operations, ``deploy.coordinator_host`` the actor that runs the coordinator
process, ``deploy.cluster`` the Ray connection, ``deploy.demo`` what ``make demo`` runs, and ``cluster.yaml``
the ``ray up`` configuration of a single-node cluster on this machine.
"""
