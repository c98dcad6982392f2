# pragma version ~=0.4.3
"""
@title OpenToken
@notice An ERC-20 (with EIP-2612 permit) standing in for OPEN on local and test chains.
        On a real chain the deployment file points at the existing OPEN token instead.
        The deployer is owner and minter: the local faucet mints test OPEN with it.
"""

from snekmate.auth import ownable
from snekmate.tokens import erc20

initializes: ownable
initializes: erc20[ownable := ownable]

exports: erc20.__interface__


@deploy
def __init__():
    ownable.__init__()
    erc20.__init__("Open Token", "OPEN", 18, "Open Token", "1")
