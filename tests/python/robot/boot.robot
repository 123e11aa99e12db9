*** Settings ***
Library    JmpLibrary

*** Test Cases ***
Device Boot Test
    Connect To Exporter    selector=vendor=acme,model=widget-v2
    Power On
    ${output}=    Read Serial Until    boot complete
    Should Not Be Empty    ${output}
    Power Off

Power Off Is Quiet And On Boots Again
    Power Off
    # What the board printed before it went off may still be on its way (a boot the test above
    # started): it is consumed once it has all arrived, i.e. once the console has been quiet
    # for a second.
    Wait Until Keyword Succeeds    30s    0s    Serial Should Stay Quiet    1
    Write Serial    root
    Serial Should Stay Quiet    1
    Power Cycle    0.2
    ${boot}=    Read Serial Until    boot complete
    Should Contain    ${boot}    U-Boot SPL
    Read Serial Until    login:
    Power Off
    Release Board
